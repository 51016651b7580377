"""Mixtures of experts from recycled experts: upcycling dense experts (mergekit-moe, BTX) into one MoE."""
