"""The maths core: noise schedules, the forward process, the losses. Pure, typed, float64, no I/O."""
