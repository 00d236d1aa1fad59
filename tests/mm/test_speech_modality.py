"""The speech modality on tiny random LLMs: token-embedding path, boundary embeddings,
batched == one-by-one transcription, chunking of long audio, both speech stages end to end,
bad input (one-line errors in inference, skip-and-count in training)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mm.config import load_config
from mm.modalities import get_type
from mm.modalities.base import LLMShape, llm_shape
from mm.modalities.speech import SPEECH, SpeechInputError, build, record_prompt
from mm.model import MultimodalLM
from mm.speech import (answer_is_correct, espeak_records, first_line, qa_agreement, qa_answer_agreement, questions,
                       speech_chunks, transcribe_files, transcribe_waves, unquote, word_error_rate)
from mm.trainable import set_trainable
from tests.helpers import tiny_llm

ROOT = Path(__file__).resolve().parents[2]
ENC = dict(preset="custom", dim=32, num_layers=1, num_heads=2, ffn_dim=64, kernel_size=5)
ADA = dict(preset="custom", dim=32, num_heads=2, ffn_dim=64)
SR = 16_000


def char_tokenizer():
    """A character-level tokenizer with a chat template (ids < 128, fits tiny_llm)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"])}
    for c in [chr(i) for i in range(32, 127)] + ["\n", "“"]:  # "“": the demo's opening boundary
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def speech_model(layers: int = 2, seed: int = 3):
    llm = tiny_llm(layers=layers)
    torch.manual_seed(seed)
    model = MultimodalLM(llm, {"audio": build(llm_shape(llm.config), encoder=ENC, adapter=ADA)})
    return model.eval(), {"audio": SPEECH}


def voice_like(seconds: float, *, seed: int = 0, pause_every: float = 0.0) -> np.ndarray:
    """Noise bursts shaped like syllables, with pauses (to give chunking quiet points)."""
    r = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    wave = 0.3 * r.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    if pause_every:
        wave[(t % pause_every) > pause_every - 0.3] = 0.0
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny random Llama + character tokenizer saved as a model directory."""
    d = tmp_path_factory.mktemp("tiny_llm")
    tiny_llm(layers=2).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


# -- the token-embedding path --------------------------------------------------------------
def test_registered_and_prompts():
    assert get_type("speech") is SPEECH and SPEECH.kind == "tokens"
    assert record_prompt({"task": "asr"}) == "Repeat after me in English:\n"
    assert record_prompt({"task": "asr", "language": "French"}) == "Repeat after me in French:\n"
    assert record_prompt({"task": "qa"}) == ""  # spoken dialogue: no task prompt
    assert record_prompt({}) is None  # -> the type's default prompt, "" (dialogue)


def test_token_path_changes_nothing_of_the_llm_and_boundaries_train():
    model, _ = speech_model()
    llm = model.llm
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    ids = torch.randint(4, 100, (2, 30))
    ref = llm(ids).logits
    assert torch.equal(model(ids), ref)  # no media: the LLM itself

    # speech: 2 waveforms -> token embeddings written at the placeholder columns
    from mm.model import MediaInput
    mod = model.modalities["audio"]
    items = [SPEECH.preprocess(torch.from_numpy(voice_like(s, seed=i)), mod) for i, s in enumerate((0.5, 0.8))]
    k = [SPEECH.num_tokens(it, mod) + 2 for it in items]
    assert k == [8, 12]  # 0.5 s: 48 fbank frames -> 12 encoder -> 6 adapter (+2 boundaries)
    media = MediaInput(inputs=SPEECH.collate(items), valid=torch.ones(2, 1, dtype=torch.bool),
                       positions=torch.tensor([[5], [5]]))
    out = model(ids, media={"audio": media})
    assert torch.equal(out[:, :5], ref[:, :5])  # text before the speech is untouched
    assert not torch.allclose(out[:, 5:], ref[:, 5:])

    set_trainable(model, ["audio.encoder", "audio.adapter", "audio.boundary"])
    assert not any(p.requires_grad for p in llm.parameters())
    boundary = mod.boundary.detach().clone()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    labels = ids.clone()
    labels[:, :20] = -100
    model.train()
    model.loss(ids, labels, attention_mask=torch.ones_like(ids), media={"audio": media}).backward()
    assert mod.boundary.grad is not None and mod.boundary.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.parameters())
    opt.step()
    assert not torch.equal(mod.boundary, boundary)
    after = llm.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # no vocabulary row changed


# -- inference -----------------------------------------------------------------------------
def test_batched_transcripts_equal_one_by_one():
    model, types = speech_model()
    tok = char_tokenizer()
    waves = [torch.from_numpy(voice_like(s, seed=i)) for i, s in enumerate((0.4, 2.3, 1.1, 0.05, 1.7))]
    waves.append(torch.zeros(SR))  # silence -> ""
    one = [transcribe_waves(model, types, tok, [w], tokens_per_second=4)[0] for w in waves]
    batched = transcribe_waves(model, types, tok, waves, batch_size=6, tokens_per_second=4)
    assert batched == one
    assert one[-1] == "" and sum(bool(t) for t in one) >= 4
    assert not any("\n" in t for t in one)  # a transcript is the reply's first line
    # the speech encoder + adapter outputs themselves do not depend on the batch
    mod = model.modalities["audio"]
    items = [SPEECH.preprocess(w, mod) for w in waves[:3]]
    emb, mask, _ = mod.embed(*mod.encode(SPEECH.collate(items)))
    for i, it in enumerate(items):
        e1, m1, _ = mod.embed(*mod.encode(SPEECH.collate([it])))
        n = int(m1.sum())
        assert int(mask[i].sum()) == n and torch.allclose(emb[i, :n], e1[0, :n], atol=1e-5)


def test_long_file_is_chunked_and_joined(tmp_path, monkeypatch):
    path = tmp_path / "three_minutes.wav"
    wave = voice_like(180.0, seed=1, pause_every=7.0)
    sf.write(path, wave, SR, subtype="PCM_16")
    pieces = list(speech_chunks(path, window=60.0))
    assert len(pieces) == 4 and all(p.shape[0] <= 60 * SR for p in pieces)
    assert all(p.shape[0] > 48 * SR for p in pieces[:-1])  # cut near the window's end...
    assert torch.allclose(torch.cat(pieces), torch.from_numpy(sf.read(path, dtype="float32")[0]))
    cuts = np.cumsum([p.shape[0] for p in pieces[:-1]]) / SR
    assert all((c % 7.0) > 6.7 for c in cuts)  # ...in a pause

    import mm.speech as speech
    calls = []
    monkeypatch.setattr(speech, "transcribe_waves",
                        lambda m, t, k, waves, **kw: calls.append(len(waves)) or [f"w{len(calls)}{i}" for i in range(len(waves))])
    out = transcribe_files(None, {"audio": SPEECH}, None, [path], batch_size=2)
    assert calls == [2, 2]  # never more than batch_size chunks in memory
    assert out == [{"file": str(path), "duration": 180.0, "text": "w10 w11 w20 w21"}]


def test_transcribe_files_end_to_end_and_sample_rates(tmp_path):
    model, types = speech_model()
    tok = char_tokenizer()
    paths = []
    for sr in (8_000, 16_000, 48_000):
        p = tmp_path / f"speech_{sr}.wav"
        t = np.arange(int(1.2 * sr)) / sr
        sf.write(p, (0.3 * np.sin(2 * np.pi * 300 * t) * (t % 0.3 < 0.2)).astype(np.float32), sr)
        paths.append(p)
    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros(SR, dtype=np.float32), SR)
    out = transcribe_files(model, types, tok, paths + [silent], batch_size=3)
    assert [o["duration"] for o in out] == [1.2, 1.2, 1.2, 1.0]
    assert all(o["text"] for o in out[:3]) and out[3]["text"] == ""


def bad_files(tmp_path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp_path / "missing.wav"
    files["empty"] = tmp_path / "empty.wav"
    files["empty"].write_bytes(b"")
    files["zero_frames"] = tmp_path / "zero.wav"
    sf.write(files["zero_frames"], np.zeros(0, dtype=np.float32), SR)
    files["corrupt"] = tmp_path / "corrupt.wav"
    files["corrupt"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)))
    good = tmp_path / "good.wav"
    sf.write(good, voice_like(1.0), SR, subtype="PCM_16")
    files["truncated"] = tmp_path / "truncated.wav"
    files["truncated"].write_bytes(good.read_bytes()[: 44 + 8000])
    files["unsupported"] = tmp_path / "notes.mp4"
    files["unsupported"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    return files


def test_bad_input_one_line_error_naming_the_file(tmp_path):
    model, types = speech_model()
    tok = char_tokenizer()
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(SpeechInputError) as e:
            transcribe_files(model, types, tok, [path])
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg, (kind, msg)


# -- metrics -------------------------------------------------------------------------------
def test_transcript_is_the_first_line_of_the_reply():
    assert first_line("  My woman lives in China.\n\nIn this context, the sentence") == "My woman lives in China."
    assert first_line("one line ") == "one line" and first_line("\n after a break\nmore") == "after a break"


def test_transcript_loses_the_quotes_the_boundaries_add_and_keeps_quoted_words():
    # what the demo's run wrote with its quote boundaries (9 of 60 held-out utterances)
    assert unquote('“We have ten hats  "') == "We have ten hats"
    assert unquote("“You have four rabbits.") == "You have four rabbits."
    assert unquote('"slow is the opposite of tall."') == "slow is the opposite of tall."
    assert unquote('“A heavy man made the hat       "') == "A heavy man made the hat"
    assert unquote("the end”") == "the end"
    # quotes that pair up inside the text are the text's
    for kept in ('He said "yes"', '"yes" he said', '"Hi" and "bye"', "no quotes at all", ""):
        assert unquote(kept) == kept
    assert word_error_rate(["we have ten hats"], ['“We have ten hats  "']) == 0.0  # WER never saw them


def test_wer_normalisation_and_agreement():
    assert word_error_rate(["Hello, World!"], ["hello   world"]) == 0.0
    assert word_error_rate(["the red cat", "a dog"], ["the bed cat", ""]) == pytest.approx(3 / 5)
    assert qa_agreement(["The capital is Paris.", None], ["the capital is paris", "4"]) == 0.5
    # by answer: a right answer in other words agrees with the text's right answer; a wrong
    # one, a missing one, or a reworded answer to a question without an answer key does not
    iran = "What is the capital of Iran?"
    text = "The capital of Iran is known as Tehran."
    assert qa_agreement(["The capital of Iran is  Tehran."], [text]) == 0.0
    assert qa_answer_agreement([iran, iran, iran, None, "Why?"],
                               ["The capital of Iran is  Tehran.", "The capital of Iraq is Baghdad.", None,
                                "the capital is paris", "Because."],
                               [text, text, text, "The capital is Paris.", "Since."]) == pytest.approx(2 / 5)


def test_spoken_questions_keep_only_right_answers():
    # the built-in questions each have a known answer; the frozen LLM's answer is a target
    # only when it is right (and short)
    qs = questions()
    assert len(qs) == len(set(qs)) and all(answer_is_correct(q, "") is False for q in qs)
    assert "What is the opposite of red?" not in qs  # colours have no opposite to check
    assert answer_is_correct("What is the capital of France?", "The capital of France is Paris.")
    assert not answer_is_correct("What is the capital of Italy?", "Il Coriobella, Italy.")
    assert not answer_is_correct("What is the capital of Turkey?", "The capital of Turkey is Istanbul.")
    assert answer_is_correct("What is the capital of Ukraine?", "Kyiv.")
    assert answer_is_correct("What is the opposite of full?", "The opposite of full is empty.")
    assert not answer_is_correct("What is the opposite of kind?", "The opposite of kind is kindness.")
    assert answer_is_correct("How many legs does a dog have?", "The answer is 4. A dog has four legs.")
    assert not answer_is_correct("How many legs does a monkey have?", "It is 23. A monkey has two legs.")
    assert not answer_is_correct("How many legs does a cow have?", "A cow has 5 legs.")
    assert answer_is_correct("What is five plus one?", "The answer to this classic math problem is 5 + 1 = 6.")
    assert not answer_is_correct("What is one plus six?", "One plus six is 10 + 6, which equals 6.")
    assert not answer_is_correct("What is one plus eight?", "To add them, you simply add them together.")
    assert answer_is_correct("What is the plural of mouse?", "The plural of mouse is mice.")
    assert not answer_is_correct("What is the plural of boy?", "The plural of boy is boy.")
    assert "What is the plural of sheep?" not in qs  # an echo of the noun would pass for its plural
    assert answer_is_correct("What did the speaker ask for?", "tea") is None  # not a built-in question


def test_question_forms_never_give_a_held_out_question():
    from mm.speech import _split_of, _texts, question_forms

    held_out = {q for q in questions() if _split_of(q, 0.2) == "eval"}
    pairs = _texts("question_forms", n=2000, seed=3, split=None, eval_fraction=0.2, llm="unused",
                   max_answer_tokens=20)
    forms = [say for say, _ in pairs]
    assert all(say == text for say, text in pairs) and len(forms) == 2000
    assert held_out and not held_out & set(forms)
    # every form at least once before any repeats; the held-out questions' words still heard
    assert len(set(forms[:len(set(forms))])) == len(set(forms))
    frame_words = {"What", "is", "the", "capital", "of", "opposite", "How", "many", "legs", "does", "a", "have",
                   "plural", "plus"}
    heard = {w for f in forms for w in f.rstrip("?").split()}
    assert {w for q in held_out for w in q.rstrip("?").split()} - frame_words <= heard
    assert question_forms(50, seed=3) == question_forms(50, seed=3) != question_forms(50, seed=4)
    assert "What is the capital of Germany?" not in question_forms(1000, exclude={"What is the capital of Germany?"})


# -- stages end to end ---------------------------------------------------------------------
def stage_config(name: str, llm_dir: Path, out: Path, sources: list[dict], **over):
    cfg = load_config(ROOT / "configs" / "demo" / f"{name}.yaml", [
        f"out={out}", f"model.llm={llm_dir}", "optim.steps=2", "optim.batch_size=4", "optim.warmup_steps=1",
        "log_every=1", "checkpoint_every=100", "data.max_bad_fraction=0.6"] + [f"{k}={v}" for k, v in over.items()])
    cfg.model.modalities["audio"].update(encoder=ENC, adapter=ADA)
    cfg.data.sources = sources
    cfg.eval.sources = []
    return cfg


def test_speech_stages_end_to_end_with_bad_samples(tmp_path, llm_dir, capsys):
    from mm.runs import load_run
    from mm.train import train

    # slow speech: the character tokenizer's targets must fit the 80 ms frames for CTC
    opts = dict(n=6, texts="sentences", voices="train", seed=3, rate=(80, 90), dir=str(tmp_path / "asr"))
    recs = espeak_records(**opts)
    assert len(recs) == 6 and all(r["task"] == "asr" and (tmp_path / "asr" / r["audio"]).exists() for r in recs)
    assert espeak_records(**opts) == recs  # reused
    bad = bad_files(tmp_path)
    manifest = tmp_path / "train.jsonl"
    lines = [{"audio": str(tmp_path / "asr" / r["audio"]), "text": r["text"], "task": "asr"} for r in recs]
    lines += [{"audio": str(bad[k]), "text": "x", "task": "asr"} for k in ("missing", "corrupt", "truncated")]
    lines += [{"audio": str(tmp_path / "asr" / recs[0]["audio"]), "text": "what is two plus two", "task": "qa"}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    sources = [{"type": "manifest", "path": str(manifest)}]

    pre = train(stage_config("speech_encoder_pretrain", llm_dir, tmp_path / "pre", sources), progress=False)
    summary = json.loads((pre / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["bad_samples"] > 0
    assert all("\n" not in b for b in summary["bad_examples"])
    metrics = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["masked_frames"] > 0 and np.isfinite(metrics[-1]["loss"])

    ad = train(stage_config("speech_adapter", llm_dir, tmp_path / "ad", sources, init_from=str(pre),
                            **{"extra.ctc_only_steps": 1}), progress=False)  # step 0: CTC only; 1: LM + CTC
    summary = json.loads((ad / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["bad_samples"] > 0
    metrics = [json.loads(x) for x in (ad / "metrics.jsonl").read_text().splitlines()]
    assert "lm_loss" not in metrics[0] and metrics[0]["ctc_loss"] > 0 and metrics[1]["lm_loss"] > 0
    model, frozen, types, _ = load_run(ad)
    out = transcribe_files(model, types, frozen.tokenizer, [tmp_path / "asr" / recs[0]["audio"]])
    assert out[0]["file"].endswith("000000.wav") and isinstance(out[0]["text"], str)
    # mm eval on a speech run: WER for the ASR records, answer agreement for the spoken-QA ones
    from mm.cli import main
    evals = tmp_path / "eval.jsonl"
    evals.write_text("\n".join(json.dumps(x) for x in lines[:2] + lines[-1:]) + "\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(ad), "--manifest", str(evals), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["speech"]  # by manifest and task
    assert res[f"{evals}.asr"]["n"] == 2 and res[f"{evals}.asr"]["wer"] >= 0
    assert res[f"{evals}.qa"]["n"] == 1 and 0 <= res[f"{evals}.qa"]["answer_agreement"] <= 1
    assert main(["eval", "--model", str(ad), "--manifest", str(evals)]) == 0
    printed = capsys.readouterr().out
    assert f"{evals}.asr: WER" in printed and f"{evals}.qa: answer agreement" in printed
    # the encoder of stage 0 was the starting point of stage 1; stage 1 changed it
    from mm.checkpoint import load_tensors
    t0, _ = load_tensors(pre / "model" / "modalities.safetensors")
    t1, _ = load_tensors(ad / "model" / "modalities.safetensors")
    key = "audio.encoder.stacker.proj.weight"
    assert not torch.equal(t0[key], t1[key])
    # an option that only sets starting values differs from the init_from run's: reported
    from mm.runs import init_option_mismatches
    other, speech = stage_config("speech_adapter", llm_dir, tmp_path / "x", sources), {"audio": get_type("speech")}
    assert init_option_mismatches(other, speech, pre) == []  # both demo stages set the same boundary_init
    other.model.modalities["audio"]["boundary_init"] = None
    [line] = init_option_mismatches(other, speech, pre)
    assert "audio.boundary_init is None here but ['“', '\"']" in line and str(pre) in line and "\n" not in line
    other.model.modalities["audio"]["boundary_init"] = ["“", "\""]
    other.model.modalities["audio"]["encoder"] = dict(ENC, branch_init=0)  # an option inside the encoder's dict
    [line] = init_option_mismatches(other, speech, pre)
    assert "audio.encoder.branch_init is 0 here but None in" in line


def test_speech_lm_without_ctc_is_the_lm_objective(tmp_path, llm_dir):
    from mm.objectives import LMObjective, get_objective
    from mm.runs import build_model

    recs = espeak_records(n=4, texts="sentences", voices="train", seed=5, dir=str(tmp_path / "asr"))
    cfg = stage_config("speech_adapter", llm_dir, tmp_path / "x", [{"type": "manifest", "path": str(tmp_path / "asr" / "records.jsonl")}],
                       **{"extra.ctc_weight": 0, "extra.ctc_only_steps": 0})
    model, llm, types = build_model(cfg.model)
    lm = LMObjective(cfg, model, types, llm.tokenizer)
    speech_lm = get_objective("speech_lm")(cfg, model, types, llm.tokenizer)
    a, _ = lm.loss(lm.batch(0))
    b, info = speech_lm.loss(speech_lm.batch(0))
    assert len(recs) == 4 and torch.allclose(a, b, atol=1e-5) and "ctc_loss" not in info


def test_ctc_buckets_hold_the_same_samples_with_less_padding_and_augment_is_per_step(tmp_path, llm_dir):
    from mm.objectives import get_objective
    from mm.runs import build_model

    recs = espeak_records(n=24, texts="sentences", voices="train", seed=6, dir=str(tmp_path / "asr"))
    src = [{"type": "manifest", "path": str(tmp_path / "asr" / "records.jsonl")}]

    def objective(**over):
        cfg = stage_config("speech_adapter", llm_dir, tmp_path / "x", src,
                           **{"extra.ctc_only_steps": 8, "extra.ctc_batch_size": 4, **over})
        model, llm, types = build_model(cfg.model)
        return get_objective("speech_lm")(cfg, model, types, llm.tokenizer)

    def frames(batch):
        return batch[1]["lengths"].tolist()

    plain, bucketed = objective(), objective(**{"extra.ctc_bucket": 4})
    a = [plain.batch(k) for k in range(8)]
    b = [bucketed.batch(k) for k in range(8)]
    for g in (0, 4):  # each group of 4 steps draws the same samples, sorted into batches by length
        assert sorted(x for k in range(g, g + 4) for x in frames(a[k])) == \
            sorted(x for k in range(g, g + 4) for x in frames(b[k]))
    padded = lambda bs: sum(len(frames(x)) * max(frames(x)) - sum(frames(x)) for x in bs)  # noqa: E731
    assert padded(b) < padded(a)
    again = objective(**{"extra.ctc_bucket": 4})  # a function of (seed, step): resuming mid-group
    assert frames(again.batch(6)) == frames(b[6]) and torch.equal(again.batch(5)[1]["features"], b[5][1]["features"])
    loss, info = bucketed.loss(b[0])
    assert torch.isfinite(loss) and info["ctc_loss"] > 0

    aug = objective(**{"extra.spec_augment": {"freq_masks": 2, "freq_width": 10, "time_masks": 1, "warp": 0.1}})
    x, y = aug.batch(3)[1], a[3][1]
    assert torch.equal(x["lengths"], y["lengths"]) and not torch.equal(x["features"], y["features"])
    assert torch.equal(aug.batch(3)[1]["features"], x["features"])  # the same step, the same masks
    assert torch.equal(plain.batch(3)[1]["features"], y["features"])  # the cached samples are untouched
    lm_aug, lm_plain = aug.batch(9)[1].media["audio"].inputs, plain.batch(9)[1].media["audio"].inputs  # LM steps
    assert torch.equal(lm_aug["lengths"], lm_plain["lengths"]) and not torch.equal(lm_aug["features"], lm_plain["features"])
    assert torch.isfinite(aug.loss(aug.batch(9))[0])
    assert len(recs) == 24


def test_phone_ctc_adds_a_phoneme_loss_on_the_encoder_frames(tmp_path, llm_dir, caplog):
    from mm.objectives import get_objective
    from mm.runs import build_model
    from mm.sources.espeak import phonemes

    recs = espeak_records(n=8, texts="sentences", voices="train", seed=7, dir=str(tmp_path / "asr"))
    manifest = tmp_path / "asr" / "records.jsonl"
    voiceless = tmp_path / "voiceless.jsonl"  # a manifest of one's own: no voice, phone_voice's phonemes
    voiceless.write_text("".join(json.dumps({"audio": str(tmp_path / "asr" / r["audio"]), "text": r["text"],
                                             "task": "asr"}) + "\n" for r in recs))
    src = [{"type": "manifest", "path": str(manifest)}, {"type": "manifest", "path": str(voiceless)}]
    over = {"extra.ctc_only_steps": 2, "extra.ctc_batch_size": 4}
    model, llm, types = build_model(stage_config("speech_adapter", llm_dir, tmp_path / "x", src, **over).model)

    def objective(**more):
        cfg = stage_config("speech_adapter", llm_dir, tmp_path / "x", src, **over, **more)
        return get_objective("speech_lm")(cfg, model, types, llm.tokenizer)

    plain, phone = objective(**{"extra.phone_ctc": 0}), objective(**{"extra.phone_ctc": 0.5, "extra.phone_voice": "en"})
    assert "phone_head" in phone.modules and "phone_head" not in plain.modules  # trained and saved with the run
    rec = dict(recs[0], audio=str(tmp_path / "asr" / recs[0]["audio"]))
    said = phone._make(rec)[1]
    assert said.phones == [phone.phone_ids[p] for p in phonemes(rec["text"], rec["voice"])]
    assert said.tokens == plain._make(rec)[1].tokens and plain._make(rec)[1].phones is None
    no_voice = phone._make({k: v for k, v in rec.items() if k != "voice"})[1]
    assert no_voice.phones == [phone.phone_ids[p] for p in phonemes(rec["text"], "en")]
    for step in (0, 2):  # a CTC-only step, then an LM step: the phoneme loss is added to the same loss
        a, info_a = plain.loss(plain.batch(step))
        b, info_b = phone.loss(phone.batch(step))
        assert "phone_loss" not in info_a and info_b["phone_loss"] > 0
        scale = 1.0 if step == 0 else phone.ctc_weight
        torch.testing.assert_close(b, a + scale * 0.5 * info_b["phone_loss"], rtol=1e-3, atol=1e-3)
    head = phone.modules["phone_head"].weight
    assert torch.autograd.grad(phone.loss(phone.batch(0))[0], head)[0].abs().sum() > 0
    # a language outside the English inventory is warned about, once; English is not
    german = objective(**{"extra.phone_ctc": 0.5, "extra.phone_voice": "de"})
    with caplog.at_level(logging.WARNING, logger="mm"):
        for obj in (phone, german):
            for r in recs * 4:
                obj._make({"audio": str(tmp_path / "asr" / r["audio"]), "text": r["text"], "task": "asr"})
    warned = [r.getMessage() for r in caplog.records if "phone_ctc" in r.getMessage()]
    assert len(warned) == 1 and "voice language 'de'" in warned[0], warned


def test_a_misspelt_extra_option_is_an_error_not_ignored(tmp_path, llm_dir):
    from mm.config import ConfigError
    from mm.objectives import get_objective
    from mm.runs import build_model

    espeak_records(n=2, texts="sentences", voices="train", seed=8, dir=str(tmp_path / "asr"))
    src = [{"type": "manifest", "path": str(tmp_path / "asr" / "records.jsonl")}]
    for stage, objective, typo in (("speech_adapter", "speech_lm", "phone_ctcc"),
                                   ("speech_encoder_pretrain", "best_rq", "mask_spam")):
        cfg = stage_config(stage, llm_dir, tmp_path / "x", src, **{f"extra.{typo}": 1})
        model, llm, types = build_model(cfg.model)
        with pytest.raises(ConfigError, match=rf"{stage}\.yaml: extra: unknown option '{typo}' for the {objective} "
                                              r"objective \(known: .*"):
            get_objective(objective)(cfg, model, types, llm.tokenizer)


def test_ctc_on_the_targets_columns_is_the_full_vocabulary_ctc(tmp_path, llm_dir):
    """_ctc runs CTC on blank + the targets' columns + one for the rest of each frame's
    probability; loss, alignment loss and gradients equal a plain CTC over every class."""
    import torch.nn.functional as F
    from torchaudio.functional import forced_align

    from mm.objectives import get_objective
    from mm.runs import build_model

    espeak_records(n=2, texts="sentences", voices="train", seed=5, dir=str(tmp_path / "asr"))
    src = [{"type": "manifest", "path": str(tmp_path / "asr" / "records.jsonl")}]
    cfg = stage_config("speech_adapter", llm_dir, tmp_path / "x", src, **{"extra.ctc_negatives": 40})
    model, llm, types = build_model(cfg.model)
    obj = get_objective("speech_lm")(cfg, model, types, llm.tokenizer)
    weight = model.llm.get_input_embeddings().weight.detach()
    torch.manual_seed(0)
    targets = [[40, 41, 41, 57], [60, 44], [45, 46, 47, 48, 49]]
    negatives = torch.randint(weight.shape[0], (40,)).tolist()
    lengths = torch.tensor([11, 6, 12])
    frames = (weight[torch.randint(weight.shape[0], (3, 12))] + 0.3 * torch.randn(3, 12, weight.shape[1])).requires_grad_()
    ctc, align = obj._ctc(frames, lengths, targets, negatives)
    got = torch.autograd.grad(ctc + align, frames)[0]

    # the plain computation: every class, squared distances as they are
    vocab = sorted({t for ts in targets for t in ts} | (set(negatives) - {obj.blank_id}))
    classes = torch.cat([weight[obj.blank_id][None], weight[vocab]])
    f = frames.detach().clone().requires_grad_()
    logp = (-(f[:, :, None] - classes).pow(2).sum(-1)).log_softmax(-1)  # (b, m, k + 1)
    tgt = [torch.tensor([vocab.index(t) + 1 for t in ts]) for ts in targets]
    ref = F.ctc_loss(logp.transpose(0, 1), torch.cat(tgt), lengths, torch.tensor([len(t) for t in tgt]),
                     blank=0, zero_infinity=True)
    dist = []
    for i, t in enumerate(tgt):
        path = forced_align(logp[i:i + 1, :int(lengths[i])].detach(), t[None], blank=0)[0][0]
        first = torch.ones_like(path, dtype=torch.bool)
        first[1:] = path[1:] != path[:-1]
        dist.append((f[i, :len(path)] - classes[torch.where(first, path, 0)]).pow(2).sum(-1))
    ref_align = torch.cat(dist).mean() / obj.scale
    want = torch.autograd.grad(ref + ref_align, f)[0]
    torch.testing.assert_close(ctc, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(align, ref_align, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert got.abs().max() > 1e-3  # a real gradient, not two zeros


# -- configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "speech").glob("*.yaml"))
                         + [ROOT / "configs" / "demo" / f"speech_{s}.yaml" for s in ("encoder_pretrain", "adapter")])
def test_speech_configs_instantiate(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mm train ") and str(path.relative_to(ROOT)) in first
    cfg = load_config(path)
    spec = dict(cfg.model.modalities["audio"])
    assert spec.pop("type") == "speech"
    llama3 = "llama3" in path.name
    one_token = lambda text: [220]  # noqa: E731  (the read-out's blank needs a tokenizer)
    row = lambda i: torch.zeros(576)  # noqa: E731  (boundary_init copies input embeddings)
    shape = (LLMShape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8) if llama3
             else LLMShape(576, 30, 9, 3, token_ids=one_token, token_embedding=row))
    with torch.device("meta"):
        mod = build(shape, **spec)
    n = sum(p.numel() for p in mod.parameters())
    assert (0.9e9 < n < 1.3e9) if llama3 else (n < 5e6)


def test_spoken_question_with_and_without_text(tmp_path):
    """``mm ask --audio``: no text -> the speech is the whole user turn; with text -> the
    question comes first and the speech after it."""
    from mm.data import make_sample

    model, types = speech_model()
    tok = char_tokenizer()
    path = tmp_path / "q.wav"
    sf.write(path, voice_like(0.6), SR)
    alone = make_sample({"audio": str(path)}, model=model, types=types, tokenizer=tok, preprocess={}, train=False)
    asked = make_sample({"audio": str(path), "question": "Who speaks?"}, model=model, types=types, tokenizer=tok,
                        preprocess={}, train=False)
    (_, pos0), = alone.media["audio"]
    (_, pos1), = asked.media["audio"]
    assert tok.decode(alone.ids[:pos0]).endswith("user\n")
    assert tok.decode(asked.ids[:pos1]).endswith("user\nWho speaks?")
    assert len(asked.ids) - len(alone.ids) == len("Who speaks?")


@pytest.mark.slow
def test_hour_long_file_in_bounded_memory(tmp_path):
    """A 1-hour file is transcribed chunk by chunk: peak memory grows by far less than the
    decoded file (230 MB as float32)."""
    import subprocess
    import sys

    path = tmp_path / "hour.wav"
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:
        for k in range(60):
            f.write(voice_like(60.0, seed=k, pause_every=5.0))
    code = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import mm.speech as speech
from mm.modalities.speech import SPEECH
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
speech.transcribe_waves = lambda m, t, k, waves, **kw: ["x"] * len(waves)
out = speech.transcribe_files(None, {{"audio": SPEECH}}, None, [{str(path)!r}], batch_size=4)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(out[0]["text"].split()), out[0]["duration"], grown // 1024)
"""
    words, duration, grown_mb = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split()
    assert float(duration) == 3600.0 and int(words) >= 60
    assert int(grown_mb) < 80


def test_vocabulary_readout_snaps_to_tokens_and_moves_blanks_last():
    from mm.modality import nearest_tokens, vocabulary_readout

    torch.manual_seed(0)
    vocab = torch.randn(50, 8)
    ids = torch.tensor([[7, 3, 7, 9, 3, 0], [3, 11, 3, 0, 0, 0]])  # 3 = blank; row 1 has 3 padded frames
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    frames = (vocab[ids] + 0.01 * torch.randn(2, 6, 8)).requires_grad_()
    assert torch.equal(nearest_tokens(frames, vocab, chunk=5), ids)  # chunked == whole
    out, read = vocabulary_readout(frames, mask, vocab, blank=3)
    # tokens in their order, then blanks, then zero padding; exact LLM embeddings
    assert torch.equal(out[0], vocab[[7, 7, 9, 0, 3, 3]])
    assert read.tolist() == [[True] * 4 + [False] * 2, [True] + [False] * 5]
    assert torch.equal(out[1, :3], vocab[[11, 3, 3]]) and not out[1, 3:].any()
    # straight-through: the gradient reaches each frame at its new place
    w = torch.randn_like(out)
    (out * w).sum().backward()
    assert torch.equal(frames.grad[0, 1], w[0, 4]) and torch.equal(frames.grad[0, 0], w[0, 0])
    assert not frames.grad[1, 3:].any()
    # without gradients the output is the embeddings themselves
    with torch.no_grad():
        assert torch.equal(vocabulary_readout(frames.detach(), mask, vocab, blank=3)[0], out.detach())

    # CTC collapse: a frame read as the token before it is a blank; a blank between keeps both
    rep = torch.tensor([[7, 7, 3, 7, 9, 9]])
    col, _ = vocabulary_readout(vocab[rep], torch.ones(1, 6, dtype=torch.bool), vocab, blank=3)
    assert torch.equal(col[0], vocab[[7, 7, 9, 3, 3, 3]])


def test_readout_model_batched_equals_one_by_one_and_text_is_untouched():
    llm = tiny_llm(layers=2)
    torch.manual_seed(3)
    model = MultimodalLM(llm, {"audio": build(llm_shape(llm.config), encoder=ENC, adapter=ADA,
                                              readout={"blank_id": 5})}).eval()
    types = {"audio": SPEECH}
    tok = char_tokenizer()
    waves = [torch.from_numpy(voice_like(s, seed=i)) for i, s in enumerate((0.4, 2.3, 1.1))]
    one = [transcribe_waves(model, types, tok, [w], tokens_per_second=4)[0] for w in waves]
    assert transcribe_waves(model, types, tok, waves, batch_size=3, tokens_per_second=4) == one
    mod = model.modalities["audio"]
    vocab = llm.get_input_embeddings().weight
    emb, mask, _ = mod.embed(*mod.encode(SPEECH.collate([SPEECH.preprocess(waves[1], mod)])), vocab)
    n = int(mask[0].sum())
    frames = emb[0, 1:n - 1]  # between the boundary embeddings: rows of the LLM's own table
    assert (frames[:, None] == vocab[None]).all(-1).any(-1).all()
    with pytest.raises(ValueError, match="needs the LLM's input embedding table"):
        mod.embed(*mod.encode(SPEECH.collate([SPEECH.preprocess(waves[1], mod)])))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), llm(ids).logits)


def _blanks_model(blanks: str):
    """A read-out model whose blank is the token its frames are read as most often (so that
    the random adapter's read-out has blank frames to keep or drop)."""
    from mm.modality import nearest_tokens

    llm = tiny_llm(layers=2)
    torch.manual_seed(3)
    model = MultimodalLM(llm, {"audio": build(llm_shape(llm.config), encoder=ENC, adapter=ADA,
                                              readout={"blank_id": 0, "blanks": blanks})}).eval()
    mod = model.modalities["audio"]
    waves = [torch.from_numpy(voice_like(s, seed=i)) for i, s in enumerate((0.9, 2.3, 1.4))]
    with torch.no_grad():
        frames, _ = mod.adapter(*mod.encode(SPEECH.collate([SPEECH.preprocess(w, mod) for w in waves])))
    mod.readout_blank = int(nearest_tokens(frames, llm.get_input_embeddings().weight).flatten().mode().values)
    return model, llm, mod, waves


def test_spoken_question_is_read_without_its_blank_frames():
    """``readout_blanks: prompted``: an utterance with a text prompt (ASR) keeps its blank
    frames; one that is the whole user turn (a spoken question) is read as its tokens only, and
    the placeholder columns it leaves are masked: the LLM computes what it computes for a
    prompt with exactly those columns."""
    from mm.data import Sample, collate
    from mm.modalities.speech import num_tokens
    from mm.prompts import encode, mark

    model, llm, mod, waves = _blanks_model("prompted")
    tok = char_tokenizer()
    vocab = llm.get_input_embeddings().weight
    item = SPEECH.preprocess(waves[1], mod)
    with torch.no_grad():
        feats, fmask = mod.encode(SPEECH.collate([item, item]))
        emb, mask, width = mod.embed(feats, fmask, vocab, torch.tensor([True, False]))
    n, k = int(mask[0].sum()), int(mask[1].sum())
    assert n == int(width[0]) == int(width[1]) == num_tokens(item, mod) + 2
    assert 2 < k < n  # some tokens read, some blank frames left out
    assert torch.equal(emb[1, :k - 1], emb[0, :k - 1])  # [begin, tokens...] as in the full read-out
    assert torch.equal(emb[1, k - 1], mod.boundary[1].detach()) and not emb[1, k:].any()
    with torch.no_grad():  # keep / drop: every item alike
        for blanks, used in (("keep", n), ("drop", k)):
            mod.readout_blanks = blanks
            assert mod.embed(feats, fmask, vocab, torch.tensor([True, False]))[1].sum(-1).tolist() == [used, used]
    mod.readout_blanks = "prompted"

    # the spoken question through the model == a prompt with exactly k placeholder columns
    pad = tok.pad_token_id
    enc = encode(tok, mark("audio"), None, media_tokens={"audio": [n]})
    batch = collate([Sample(enc.ids, enc.labels, {"audio": [(item, enc.media[0][1])]}, prompted=False)],
                    types={"audio": SPEECH}, pad_id=pad)
    assert batch.media["audio"].prompted.tolist() == [[False]]
    att = batch.attention_mask.clone()
    with torch.no_grad():
        h, *_ = model.run(batch.input_ids, att, media=batch.media)
        got = model.logits(h[:, -1])
    p = enc.media[0][1]
    assert att[0, p:p + k].all() and not att[0, p + k:p + n].any() and int(att.sum()) == len(enc.ids) - (n - k)
    short = encode(tok, mark("audio"), None, media_tokens={"audio": [k]})
    with torch.no_grad():
        rows = llm.get_input_embeddings()(torch.tensor([short.ids]))
        rows[0, p:p + k] = emb[1, :k]
        want = llm(inputs_embeds=rows).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    # spoken questions of mixed lengths (holes in the batch's masks): batched == one by one,
    # and the ASR prompt still shows the blank frames (other replies than without them)
    one = [transcribe_waves(model, {"audio": SPEECH}, tok, [w], prompt="", tokens_per_second=4)[0] for w in waves]
    assert transcribe_waves(model, {"audio": SPEECH}, tok, waves, prompt="", batch_size=3, tokens_per_second=4) == one
    asr = transcribe_waves(model, {"audio": SPEECH}, tok, waves, batch_size=3, tokens_per_second=4)
    mod.readout_blanks = "keep"
    assert transcribe_waves(model, {"audio": SPEECH}, tok, waves, batch_size=3, tokens_per_second=4) == asr


def test_records_say_whether_the_speech_came_with_text(tmp_path):
    from mm.data import collate, make_sample

    model, llm, mod, waves = _blanks_model("prompted")
    tok = char_tokenizer()
    path = tmp_path / "q.wav"
    sf.write(path, waves[0].numpy(), SR)
    types = {"audio": SPEECH}
    made = [make_sample(rec, model=model, types=types, tokenizer=tok, preprocess={}, train=False)
            for rec in ({"audio": str(path), "task": "asr"}, {"audio": str(path), "task": "qa"},
                        {"audio": str(path)}, {"audio": str(path), "question": "who speaks? <|mm:audio|>"},
                        {"audio": str(path), "question": " <|mm:audio|> "})]
    assert [s.prompted for s in made] == [True, False, False, True, False]
    batch = collate(made, types=types, pad_id=tok.pad_token_id)
    assert batch.media["audio"].prompted[:, 0].tolist() == [True, False, False, True, False]


def test_readout_options_are_checked():
    shape = LLMShape(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, token_ids=lambda text: [1] * len(text))
    assert build(shape, encoder=ENC, adapter=ADA, readout={"blank": " "}).readout_blank == 1
    assert build(shape, encoder=ENC, adapter=ADA).readout_blank is None
    with pytest.raises(ValueError, match="must be one token"):
        build(shape, encoder=ENC, adapter=ADA, readout={"blank": "  "})
    with pytest.raises(ValueError, match="one of blank"):
        build(shape, encoder=ENC, adapter=ADA, readout={"blank": " ", "blank_id": 3})
    assert build(shape, encoder=ENC, adapter=ADA, readout={"blank": " ", "blanks": "prompted"}).readout_blanks == "prompted"
    with pytest.raises(ValueError, match="readout blanks must be one of"):
        build(shape, encoder=ENC, adapter=ADA, readout={"blank": " ", "blanks": "sometimes"})
    with pytest.raises(ValueError, match="needs the LLM's tokenizer"):
        build(LLMShape(dim=16, n_layers=2, n_heads=2, n_kv_heads=2), encoder=ENC, adapter=ADA, readout={"blank": " "})


def test_boundary_init_copies_token_embeddings_into_new_parameters():
    llm = tiny_llm(layers=2)
    tok = char_tokenizer()
    table = llm.get_input_embeddings().weight
    before = table.detach().clone()
    shape = llm_shape(llm.config, tok, table)
    nl, dot = tok("\n", add_special_tokens=False)["input_ids"][0], tok(".", add_special_tokens=False)["input_ids"][0]
    mod = build(shape, encoder=ENC, adapter=ADA, boundary_init="\n")
    assert torch.equal(mod.boundary[0], table[nl]) and torch.equal(mod.boundary[1], table[nl])
    mod = build(shape, encoder=ENC, adapter=ADA, boundary_init=["\n", "."])
    assert torch.equal(mod.boundary[1], table[dot])
    assert mod.boundary.data_ptr() != table.data_ptr()  # a copy: training it leaves the table alone
    with torch.no_grad():
        mod.boundary.add_(1.0)
    assert torch.equal(table, before)
    with pytest.raises(ValueError, match="must be one token"):
        build(shape, encoder=ENC, adapter=ADA, boundary_init="ab")
    with pytest.raises(ValueError, match="one text or a list of two"):
        build(shape, encoder=ENC, adapter=ADA, boundary_init=["\n"])
    with pytest.raises(ValueError, match="needs the LLM's tokenizer and input embeddings"):
        build(llm_shape(llm.config, tok), encoder=ENC, adapter=ADA, boundary_init="\n")
