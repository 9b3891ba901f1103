"""The torchrun world (ranks, the few collectives the loop needs) and FSDP2 sharding of students and teachers."""
