"""bench.py's memory counter (benchmarks/memcount.py): a Linear layer by hand, fake tensors against a real run."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import memcount as B

TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)


def test_counter_linear_by_hand():
    """Linear(1000 -> 500) + ReLU + sum, AdamW: every plateau of the count, byte for byte."""
    weights, x_bytes = (500 * 1000 + 500) * 4, 64 * 1000 * 4
    with FakeTensorMode():  # no real memory: shapes and dtypes only
        counter = B.StorageCounter()
        with counter:
            lin = torch.nn.Linear(1000, 500)
            opt = torch.optim.AdamW(lin.parameters(), foreach=True)
            x = torch.randn(64, 1000)
            assert counter.live == weights + x_bytes
            loss = torch.relu(lin(x)).sum()
            # Kept for the backward pass: the ReLU output (its gradient needs it), (64, 500) float32, plus the
            # 4-byte loss. Linear keeps x, counted already; its own output is freed (ReLU made a new tensor).
            assert counter.live == weights + x_bytes + 64 * 500 * 4 + 4
            loss.backward()  # the ReLU output is released, the gradients (the size of the weights) arrive
            assert counter.live == weights + x_bytes + 4 + weights
            counter.reset_peak()
            opt.step()
            # AdamW state: exp_avg and exp_avg_sq per parameter, and a float32 step counter per parameter.
            assert counter.live == weights + x_bytes + 4 + weights + 2 * weights + 2 * 4
            assert counter.peak > counter.live  # foreach AdamW's temporaries (e.g. the sqrt of exp_avg_sq)
            opt.zero_grad(set_to_none=True)
            assert counter.live == weights + x_bytes + 4 + 2 * weights + 2 * 4
    assert B.storage_bytes([lin.weight, lin.weight.T, lin.bias]) == weights  # a view shares its storage


def test_fake_count_equals_real_run():
    """The same tiny align step counted on fake tensors and run for real: identical bytes at every point."""
    def model():
        torch.manual_seed(0)
        return B.build(4, ckpt=True, bert=TINY_BERT, widths=(8, 16, 32, 64))

    def inputs():
        return B.make_batch(2, (8, 16, 16), 16, vocab=TINY_BERT["vocab_size"])
    for amp in (False, True):
        fake = B.count_step(model, inputs, amp, fake=True, gpu_like=False)
        real = B.count_step(model, inputs, amp, fake=False)
        assert fake == real
        assert fake["grads"] == fake["weights"] - sum(b.nbytes for b in model().buffers())  # BN stats get no grads
        assert fake["adam"] == 2 * fake["grads"] + 4 * len(list(model().parameters()))
        assert fake["peak"] >= fake["end_fwd"] > fake["weights"] + fake["adam"] + fake["batch"]


def test_gpu_kernels_drop_the_attention_matrices():
    """With the GPU's kernels, BERT keeps no B x heads x L x L attention probabilities, nor float dropout masks."""
    def model():
        return B.build(4, ckpt=False, text_ckpt=False, bert=dict(TINY_BERT, num_hidden_layers=1), widths=(8, 16, 32, 64))

    def inputs():
        return B.make_batch(2, (16, 32, 32), 64, vocab=TINY_BERT["vocab_size"])
    cpu, gpu = (B.count_step(model, inputs, False, gpu_like=g)["activations"] for g in (False, True))
    # CPU math path: probabilities, float dropout noise and dropped probabilities, (2, 2, 64, 64) float32 each.
    assert cpu - gpu >= 3 * 2 * 2 * 64 * 64 * 4
