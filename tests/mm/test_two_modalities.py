"""Image and speech adapters on one frozen LLM, trained in separate stages, used together:
a spoken question about an image."""

import json
from pathlib import Path

import soundfile as sf

from mm.config import load_config
from mm.infer import answer_records
from mm.runs import load_run
from mm.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"


def test_image_then_speech_then_ask_with_both(tmp_path, tiny_llm_dir, image_manifest):
    img_run = train(load_config(CONFIGS / "image_adapter_pretrain.yaml", [
        f"out={tmp_path / 'img'}", f"model.llm={tiny_llm_dir}", "init_from=null", "optim.steps=2",
        "optim.batch_size=2", f"data.sources=[{{type: manifest, path: {image_manifest}}}]",
        "model.modalities.image.adapter={every: 2}"]), progress=False)
    image_cfg = load_config(img_run / "config.yaml").model.modalities["image"]
    cfg = load_config(CONFIGS / "speech_adapter.yaml", [
        f"out={tmp_path / 'both'}", f"model.llm={tiny_llm_dir}", f"init_from={img_run}", "optim.steps=2",
        "optim.batch_size=2", "objective=lm", "extra={}",
        "data.sources=[{type: espeak, task: asr, texts: sentences, n: 4, voices: train, seed: 0}]"])
    cfg.model.modalities = {"image": image_cfg, **cfg.model.modalities}
    both = train(cfg, progress=False)
    model, llm, types, _ = load_run(both)
    assert set(model.modalities) == {"image", "audio"}
    # the image adapter is the one trained in the first stage, unchanged by the second
    first, _, _, _ = load_run(img_run)
    for k, v in first.modalities["image"].state_dict().items():
        assert (model.modalities["image"].state_dict()[k] == v).all(), k
    from mm.sources.espeak import synthesize
    wav, sr = synthesize("what color is the shape", voice="en+f3")
    sf.write(tmp_path / "q.wav", wav, sr)
    img = next(p for p in Path(image_manifest).parent.glob("*.png"))
    out = answer_records(model, types, llm.tokenizer, [{"image": str(img), "audio": str(tmp_path / "q.wav")}],
                         max_new_tokens=4)
    assert isinstance(out[0], str)
