"""Prepare a folder's records in a store and build every batch of an epoch in a DataLoader worker, as training does;
print the memory the process and its worker hold, and the size of the store entries the records use:

    python tests/store_worker.py MODEL_DIR DATA_DIR STORE_DIR
"""

import json
import os
import sys

import torch

from hypernet import data
from hypernet.memory import held_memory, release_free_memory
from hypernet.prompts import PromptEncoder
from hypernet.training import load_models


def main():
    model_dir, data_dir, store_dir = sys.argv[1:4]
    entries = data.folder_entries(data_dir)
    models = load_models(model_dir)
    prompt_encoder = PromptEncoder(models.tokenizers, models.text_encoders)
    encoders = data.Encoders(models.vae, prompt_encoder, "cpu", torch.float32, vae_id="t", text_id="t")
    settings = data.DataSettings(name="m", resolution=64)
    records, _ = data.prepare_records(entries, ["[filewords]"], settings, encoders, store_dir)
    release_free_memory()
    sampler = data.EpochBatchSampler(records.sizes(), 8, 0, records.chunk_counts())
    loader = torch.utils.data.DataLoader(
        data.TrainingSamples(records, ["[filewords]"], settings),
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=1,
    )
    held, batches = 0, 0
    for samples in loader:
        assert samples["encoder_hidden_states"].shape[1:] == (77, 96)
        batches += 1
        if batches % 50 == 0:
            held = max(held, held_memory())
    held = max(held, held_memory())
    stored = sum(os.path.getsize(records.store.path(kind, key)) for kind, key in records._entries())
    print(json.dumps({"held": held, "stored": stored, "images": len(records), "batches": batches}))


if __name__ == "__main__":
    main()
