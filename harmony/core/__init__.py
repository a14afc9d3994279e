"""The bottom layer: helpers every other package may use and that import no other `harmony` package
(process-group collectives, ramps, colour parsing, the checkpoint file format)."""
