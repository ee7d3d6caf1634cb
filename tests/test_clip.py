"""The CLIP track at `smoke` scale: models, caption data, losses, BadCLIP, poisoning, CleanCLIP.

The measured values in comments are from `make test`, which runs this file with torch on one thread."""
import pytest
import torch

pytest.importorskip("open_clip")

from backdoorlab import clip  # noqa: E402
from backdoorlab.clip import badclip, losses, models, poisoning, training  # noqa: E402

SCALE = "smoke"


@pytest.fixture(scope="module")
def data():
    return clip.data_for(SCALE)


@pytest.fixture(scope="module")
def parts(data):
    return clip.splits(data, SCALE)


@pytest.fixture(scope="module")
def pretrained(data):
    return clip.pretrain(data, SCALE)


def test_tokenizer_and_forward_shapes():
    tokens = clip.tokenize(["a photo of a banana.", "a small red star on a striped background."])
    assert tokens.shape == (2, models.CONTEXT_LENGTH) and tokens.dtype == torch.int64
    model = clip.create("rn-micro")
    image, text = model(torch.rand(3, 3, 32, 32), tokens[[0, 1, 0]])
    assert image.shape == text.shape == (3, 64)
    assert torch.allclose(image.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text[0], text[2], atol=1e-6)
    assert model.encode_image(torch.rand(2, 1, 28, 28)).shape == (2, 64)  # grayscale, other size: resized


def test_a_real_open_clip_architecture_runs_the_tiny_tracks_inputs():
    """The path for real weights, without them: RN50 with random weights (``pretrained=None``)
    takes 32x32 scenes (resized to 224) and 32-token captions (padded to 77)."""
    model = clip.create("RN50", pretrained=None).eval()
    assert model.context_length == 77 and model.image_size == (224, 224)
    with torch.no_grad():
        image, text = model(torch.rand(2, 3, 32, 32), clip.tokenize(["a photo of a banana.", "a red star."]))
        padded = model.encode_text(clip.tokenize(["a photo of a banana."], 77))
    assert image.shape == text.shape == (2, 1024)
    assert torch.allclose(text[:1], padded, atol=1e-5)  # padding a caption does not change its embedding


def test_contrastive_loss_is_symmetric_and_minimal_for_matching_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    assert torch.allclose(losses.contrastive(a, b, 10.0)[0], losses.contrastive(b, a, 10.0)[0])
    matched = losses.contrastive(a, a, 10.0)[0]
    assert matched < losses.contrastive(a, a[torch.randperm(16, generator=g)], 10.0)[0]
    assert matched < losses.contrastive(a, b, 10.0)[0]


def test_caption_data_is_seeded_and_consistent():
    one, again, other = clip.generate(64, 16, seed=3), clip.generate(64, 16, seed=3), clip.generate(64, 16, seed=4)
    assert torch.equal(one.images, again.images) and one.captions == again.captions
    assert not torch.equal(one.images, other.images)
    assert one.images.shape == (64, 3, 32, 32) and one.images.dtype == torch.uint8
    for caption, label in zip(one.captions, one.labels.tolist()):
        assert clip.CLASSES[label] in caption
    assert len(set(one.captions)) > 32  # varied captions


def test_poisoning_changes_only_chosen_non_target_pairs(parts):
    pairs = parts["finetune"]
    trigger = poisoning.baseline_trigger("badnets")
    poisoned, rows = poisoning.poison(pairs, trigger, 25, target=0, captions="natural")
    assert len(rows) == 25 and (pairs.labels[rows] != 0).all()
    changed = (poisoned.images != pairs.images).flatten(1).any(1)
    assert set(torch.nonzero(changed).squeeze(1).tolist()) <= set(rows.tolist())
    assert all("banana" in poisoned.captions[r] for r in rows.tolist())
    assert sum(a != b for a, b in zip(poisoned.captions, pairs.captions)) <= 25
    assert torch.equal(poisoned.tokens[rows], clip.tokenize([poisoned.captions[r] for r in rows.tolist()]))


def test_bad_input_is_refused_before_compute(parts, monkeypatch):
    with pytest.raises(ValueError, match="valid choices"):
        clip.create("no-such-clip")
    with pytest.raises(ValueError, match="valid choices"):
        poisoning.baseline_trigger("no-such-trigger")
    with pytest.raises(ValueError, match="valid choices"):
        training.get_scale("huge")
    with pytest.raises(ValueError, match="non-target"):
        poisoning.poison(parts["finetune"], poisoning.baseline_trigger("badnets"), 10 ** 6)
    with pytest.raises(ValueError, match="valid choices"):
        poisoning.target_captions(parts["finetune"], 0, "poetic", 3)
    with pytest.raises(ValueError, match="valid choices: badclip, badnets"):
        clip.protocol.check(["badclip", "trojan"])
    with pytest.raises(ValueError, match="valid choices: finetune, cleanclip"):
        clip.protocol.check(defenses=["anp"])
    with pytest.raises(ValueError, match="lineage"):
        clip.finetune(clip.create("rn-micro"), parts["finetune"], SCALE, {}, lr=1e-3, epochs=1)
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(models.PretrainedNotAvailable, match="offline"):
        clip.create("RN50", pretrained="openai")


def test_pretrained_tiny_clip_classifies_zero_shot(pretrained, data):
    assert clip.zero_shot(pretrained, data)["acc"] >= 0.6  # 10 classes: chance is 0.1; measured 0.924


def test_badclip_patch_lowers_its_objective(pretrained, parts):
    pairs = parts["finetune"]
    g = torch.Generator().manual_seed(1)
    others = torch.nonzero(pairs.labels != 0).squeeze(1)
    rows = others[torch.randperm(len(others), generator=g)[:64]]
    x = pairs.images[rows].float() / 255
    tokens = clip.tokenize(poisoning.target_captions(pairs, 0, "natural", 64, seed=1))
    positives = pretrained.encode_image(pairs.images[pairs.labels == 0][:64].float() / 255).detach()
    start = (0.5 + 0.25 * torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    patch = badclip.optimise_patch(pretrained, pairs, 0, steps=60)
    with torch.no_grad():
        before = badclip.objective(pretrained, x, start, tokens, positives)
        after = badclip.objective(pretrained, x, patch, tokens, positives)
    assert after <= before - 0.25  # measured 11.84 -> 10.78 (in-batch duplicate target captions bound it from below)
    assert patch.shape == (1, 3, 4, 4) and patch.min() >= 0 and patch.max() <= 1


RATE = 0.03  # the notebook's default poisoning rate: tests and nbval share these models through the zoo


@pytest.fixture(scope="module")
def blended(pretrained, parts):
    trigger = clip.trigger_for("blended", pretrained, parts["finetune"], 0, SCALE)
    return trigger, clip.backdoor(pretrained, parts["finetune"], trigger, SCALE, RATE)


def test_poisoned_clip_has_asr_well_above_a_clean_one(pretrained, data, blended):
    trigger, backdoored = blended
    clean = clip.zero_shot(pretrained, data, trigger)
    poisoned = clip.zero_shot(backdoored, data, trigger)
    # measured: non-target ASR 0.011 on the clean model, 0.894 after poisoning
    assert poisoned["asr_nontarget"] >= clean["asr_nontarget"] + 0.6
    assert poisoned["acc"] >= clean["acc"] - 0.05


def test_cleanclip_lowers_a_baseline_attacks_asr(data, parts, blended):
    trigger, backdoored = blended
    defended = clip.defend(backdoored, parts["defense"], "cleanclip", SCALE)
    before = clip.zero_shot(backdoored, data, trigger)
    after = clip.zero_shot(defended, data, trigger)
    assert defended.lineage["parent"] == backdoored.lineage  # the zoo key names the whole lineage
    # measured: non-target ASR 0.894 -> 0.015, zero-shot accuracy 0.928 -> 0.900 (CleanCLIP's
    # strong augmentations on 1,000 pairs cost three points at smoke)
    assert after["asr_nontarget"] <= before["asr_nontarget"] - 0.3
    assert after["acc"] >= before["acc"] - 0.1
