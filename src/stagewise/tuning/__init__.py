"""Choosing settings: the LR range test (lr_find) and searches over plans (a trial is a plan)."""
