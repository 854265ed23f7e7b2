"""postlab.lm.data: the data every pillar reads, below the trainer and the tasks.

`sources`: where the offline data lives (`$POSTLAB_DATA` or `../shared/data`) and the readers of its
files (instructions, WikiText-2, JSON/JSONL rows), with the hub's datasets as the fallback;
`batching`: examples -> padded, shuffled, resumable grain batches for the trainer.
"""

from lm.data.sources import (REPO_ROOT, load_instructions, load_wikitext, open_text, read_rows,
                             shared_data_dir, shared_file)
