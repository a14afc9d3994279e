"""The bottom layer: helpers every other package may use and that import no other `harmony` package
(the user-facing errors and their exit codes, the device choice, process-group collectives, ramps,
colour parsing, the checkpoint file format)."""
