"""Labelled text that experts, statistics, routers and evaluations read: the task registry and its splits."""
