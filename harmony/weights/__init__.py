"""Weights from other libraries and from earlier runs to start a run from (`harmony train --init SOURCE`):
`resolve` turns the spec into a `Source` (its architecture and, on demand, its weights under the names of
Harmony's image-text pair), `apply` sets the run's architecture to the source's and initialises the student."""
