"""Many processes: FSDP2/HSDP/DDP/FSDP1 set-up, the groups of the projection's sums, sharded export."""
