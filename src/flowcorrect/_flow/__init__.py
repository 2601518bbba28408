"""The flow sampler: Euler integration of a flow-matching policy, with corrections placed
after the ODE or inside its steps. The public names are re-exported by `flowcorrect`."""
