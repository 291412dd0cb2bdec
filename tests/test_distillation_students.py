"""Layer-dropped students: the kept blocks are the teacher's, the copy saves, reloads and generates."""

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.distill.students import decoder_layers, drop_layers
from slimtune.errors import SlimtuneError


def four_layer_llama():
    torch.manual_seed(0)
    config = {**TINY_LLAMA, "num_hidden_layers": 4}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).eval()


def test_every_other_layer_keeps_the_teachers_blocks(tmp_path):
    teacher = four_layer_llama()
    student = drop_layers(teacher)
    assert student.config.num_hidden_layers == 2 and len(decoder_layers(teacher)) == 4  # the teacher is untouched
    for new, old in zip(decoder_layers(student), (0, 2)):
        for (name, p), q in zip(new.named_parameters(), decoder_layers(teacher)[old].parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name  # copied, not shared
    assert [layer.self_attn.layer_idx for layer in decoder_layers(student)] == [0, 1]
    ids = torch.randint(1, TINY_LLAMA["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        student.save_pretrained(tmp_path / "student")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        assert not torch.allclose(teacher(input_ids=ids).logits, expected)
        out = reloaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (1, 13)


def test_bad_layer_choices_are_refused():
    with pytest.raises(SlimtuneError, match=r"keep=\[0, 4\] is not valid; valid: increasing, distinct indices in 0..3"):
        drop_layers(four_layer_llama(), [0, 4])
    with pytest.raises(SlimtuneError, match="keep='half' is not valid"):
        drop_layers(four_layer_llama(), "half")
