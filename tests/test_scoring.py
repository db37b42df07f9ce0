import numpy as np
import pytest

from vidsparse import SCORERS
from vidsparse.errors import InputError
from vidsparse.scoring import CandidateScores
from vidsparse.scoring.base import CombinedScorer, token_f1
from vidsparse.scoring.subtitles import parse_srt
from vidsparse.types import Query
from vidsparse.video.synthetic import object_query_image

SRT = """1
00:00:01,000 --> 00:00:04,500
Welcome to the harbour tour.

2
00:00:30,000 --> 00:00:33,000
<i>Please proceed to gate 47 now.</i>

3
00:01:10,250 --> 00:01:12,000
The weather is sunny today.
"""


def test_token_f1():
    assert token_f1("GATE 47", "gate 47") == 1.0
    assert token_f1("GATE 47", "EXIT 3") == 0.0
    assert token_f1("GATF 47", "gate 47") == 1.0  # one misread letter still matches
    assert token_f1("the gate", "gate 47 is open") == pytest.approx(2 * 0.5 * 0.25 / 0.75)


def test_parse_srt():
    cues = parse_srt(SRT)
    assert [(c.start, c.end) for c in cues] == [(1.0, 4.5), (30.0, 33.0), (70.25, 72.0)]
    assert cues[1].text == "Please proceed to gate 47 now."
    with pytest.raises(InputError, match="no subtitle cues"):
        parse_srt("hello world")
    with pytest.raises(InputError, match="malformed cue time"):
        parse_srt("1\n00:00:01 --> 00:00:02\nx\n")


def test_subtitle_scorer_maps_cues_to_time(tmp_path, synth_index):
    p = tmp_path / "s.srt"
    p.write_text(SRT)
    sc = SCORERS.from_spec(f"subtitles:path={p},window_s=0")
    s = CandidateScores(synth_index, sc, Query(text="gate 47")).all()
    t = synth_index.times
    inside = (t >= 30) & (t < 33)
    assert s[inside].min() > 0.5
    assert s[inside].min() > 3 * s[~inside].max()
    with pytest.raises(InputError, match="no such subtitle"):
        SCORERS.from_spec("subtitles:path=/nonexistent.srt")


def test_visual_scorer_finds_the_object(synth, synth_index):
    gt = synth[1]
    s = CandidateScores(synth_index, SCORERS.from_spec("visual"), Query(image=object_query_image())).all()
    on = np.array([any(e.contains(t) for e in gt.object_events) for t in synth_index.times])
    # The object frames outrank the rest: the top third of the object frames beat every other frame.
    assert np.percentile(s[on], 66) > s[~on].max()
    with pytest.raises(InputError, match="query image"):
        SCORERS.from_spec("visual").score(synth_index.frames, Query(text="x"))


def test_ocr_scorer_reads_the_caption(synth, synth_index):
    gt = synth[1]
    ocr = SCORERS.from_spec("ocr")
    needle = gt.needle_events[0]
    other = next(e for e in gt.text_events if e.label != gt.needle_text)
    blank = next(t for t in synth_index.times if not any(e.contains(t, 1.0) for e in gt.text_events))
    idx = [int(np.searchsorted(synth_index.times, x)) for x in (np.ceil(needle.start + 1), np.ceil(other.start + 1), blank)]
    cs = CandidateScores(synth_index, ocr, Query(text=gt.needle_text))
    s = cs.get(idx)
    assert s[0] > 0.9 and s[1] < 0.5 and s[2] == 0.0
    assert cs.frames_scored == 3 and cs.frames_decoded == 3
    assert gt.needle_text in ocr.lines_read[float(synth_index.times[idx[0]])]
    cs.get(idx)  # memoised: nothing is scored twice
    assert cs.frames_scored == 3


def test_combined_scorer_is_max(tmp_path, synth_index):
    p = tmp_path / "s.srt"
    p.write_text(SRT)
    a = SCORERS.from_spec(f"subtitles:path={p}")
    both = CombinedScorer((a, SCORERS.from_spec("visual")))
    assert both.input == "thumbs" and not both.expensive
    frames = synth_index.frames.take(np.arange(40))
    q = Query(text="gate 47", image=object_query_image())
    expect = np.maximum(a.score(frames, q), SCORERS.from_spec("visual").score(frames, q))
    assert np.array_equal(both.score(frames, q), expect)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP built from the transformers config classes, with a word-level tokenizer: no download."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", "gate", "47", "red", "ball", "exit"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                         eos_token="[EOS]").save_pretrained(path)
    return str(path)


def test_clip_scorer_with_tiny_random_model(tiny_clip, synth_index, monkeypatch):
    sc = SCORERS.from_spec(f"clip:path={tiny_clip}")
    assert sc.frame_size == (32, 32)
    cs = CandidateScores(synth_index, sc, Query(text="gate 47"))
    s = cs.get(np.arange(0, 180, 9))
    assert s.shape == (20,) and np.all((s >= 0) & (s <= 1)) and cs.frames_decoded == 20
    # An image query equal to one frame gives that frame cosine 1 -> score 1. Its neighbours in the same static scene
    # score within 1e-6 of it through this random tower (the query is embedded alone, the candidates in a batch, so
    # the two embeddings of that frame differ in rounding: an argmax among them once picked a neighbour); frames of
    # another scene score clearly lower.
    frame = synth_index.reader.read_at([50.0], size=(32, 32)).data[0]
    s_img = CandidateScores(synth_index, sc, Query(image=frame)).get(np.arange(40, 60))
    assert s_img[10] == pytest.approx(1.0, abs=1e-5) and s_img[10] >= s_img.max() - 1e-5
    assert s_img.min() < s_img[10] - 0.01
    monkeypatch.setenv("VIDSPARSE_CLIP_PATH", tiny_clip)
    assert SCORERS.from_spec("clip").path == tiny_clip
    from vidsparse.moments import default_scorer_spec

    assert default_scorer_spec(Query(text="x")) == "clip"


def test_clip_scorer_needs_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("VIDSPARSE_CLIP_PATH", raising=False)
    with pytest.raises(InputError, match="local weights"):
        SCORERS.from_spec("clip")
    with pytest.raises(InputError, match="no config.json"):
        SCORERS.from_spec(f"clip:path={tmp_path}")


def test_combined_scorer_decodes_at_the_parts_size(tmp_path):
    """OCR caps decoding at 960 px; combined with subtitles (no pixels) the cap must still apply."""
    from vidsparse.types import VideoInfo

    p = tmp_path / "s.srt"
    p.write_text(SRT)
    both = CombinedScorer((SCORERS.from_spec("ocr"), SCORERS.from_spec(f"subtitles:path={p}")))
    info = VideoInfo("x", 10.0, 30.0, 3840, 2160, "h264", False, 0.0, 300)
    assert both.decode_size(info) == (540, 960)
