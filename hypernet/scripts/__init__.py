"""The scripts behind the commands: train_hypernetwork (hypernet-train), generate (hypernet-generate) and convert
(hypernet-convert), each argparse -> main() in the diffusers example style. The files of the same names at the top
of a checkout run them (`python train_hypernetwork.py`, `accelerate launch train_hypernetwork.py`). The library
(the rest of the package) never imports them."""
