"""The commands: one module per command, each with `main(argv=None) -> exit status` (0 done, 2 bad
input, 1 a failed run). `launch/<command>.py` is the entry point of each; tests call
`mmvae.cli.<command>.main([...])`."""
