"""hypernet.data.prepare_records in each process of a torchrun launch; each process saves every record it reads
afterwards to OUT.RANK, to compare with one process's records:

    torchrun --nproc_per_node 2 tests/records_worker.py MODEL_DIR DATA OUT SETTINGS_JSON STORE [--streaming]

An unreadable image ends every process with its one-line error and exit code 2.
"""

import json
import sys

import torch
from accelerate import PartialState

from hypernet import data
from hypernet.errors import UsageError
from hypernet.prompts import PromptEncoder
from hypernet.training import load_models


def records_as_dict(records):
    """Every tensor and field of every record, by name."""
    tensors, fields = {}, []
    for index in range(len(records)):
        record = records[index]
        for name in ("means", "stds", "weight", "embedding", "pooled_embedding"):
            if getattr(record, name) is not None:
                tensors[f"{index}.{name}"] = getattr(record, name)
        fields.append(
            [
                record.size,
                record.original_size,
                record.crop_top_left,
                record.flipped_crop_top_left,
                record.caption,
                record.prompt,
            ]
        )
    return tensors, fields


def main():
    model_dir, source, out, settings, store = sys.argv[1:6]
    streaming = "--streaming" in sys.argv[6:]
    state = PartialState(cpu=True)
    models = load_models(model_dir)
    prompt_encoder = PromptEncoder(models.tokenizers, models.text_encoders)
    encoders = data.Encoders(models.vae, prompt_encoder, "cpu", torch.float32, vae_id="t", text_id="t")
    entries = data.dataset_entries(source, streaming=True) if streaming else data.folder_entries(source)
    try:
        records, _ = data.prepare_records(
            entries, ["[filewords], [name]"], data.DataSettings(**json.loads(settings)), encoders, store, state=state
        )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tensors, fields = records_as_dict(records)
    torch.save({"tensors": tensors, "fields": fields, "index": records.folder}, f"{out}.{state.process_index}")


if __name__ == "__main__":
    main()
