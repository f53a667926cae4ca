"""PNG files that carry their generation parameters as AUTOMATIC1111 infotext, so the webui's PNG Info reads them."""

from PIL import PngImagePlugin

from .formats import atomic_write


def infotext(
    prompt,
    negative_prompt="",
    steps=None,
    sampler=None,
    cfg_scale=None,
    seed=None,
    width=None,
    height=None,
    model_hash=None,
    model=None,
    hypernetworks=(),
):
    """A1111's parameters text: prompt, optional 'Negative prompt:' line, then 'Key: value' pairs.

    hypernetworks: (name, multiplier) pairs, written as A1111 writes them ('Hypernet', 'Hypernet strength';
    several are joined with ', ').
    """
    fields = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}" if width and height else None,
        "Model hash": model_hash,
        "Model": model,
    }
    if hypernetworks:
        fields["Hypernet"] = ", ".join(name for name, _ in hypernetworks)
        fields["Hypernet strength"] = ", ".join(f"{m:g}" for _, m in hypernetworks)
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    pairs = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
    return f"{text}\n{pairs}"


def save_png(image, path, parameters=None):
    """Save a PIL image as PNG with an A1111 'parameters' text chunk, under a temporary name renamed into place."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
