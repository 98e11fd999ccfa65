"""Offline pipeline: router training (three losses) and the genetic sparsity-schedule search."""
