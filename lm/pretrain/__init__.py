"""postlab.lm.pretrain: pretraining from scratch and the attention-sink studies.

The tasks on top: `task` (launch task `pretrain`: token store -> packed batches -> the trainer ->
report) and `sinks` (launch task `sinks`: per-head sink statistics, mask variants, streaming
decode). Below them: `corpus` (documents -> memory-mapped token store -> packed grain windows),
`streaming` (StreamingLLM's rolling sink + window KV cache) and `sink_stats` (per layer/head
attention statistics).
"""
