"""A synthetic cost profile shaped like the measured Flux.1 one (H200, bf16, 4,096 + 512 tokens).

Units are the engine's 64 MiB chunks of Flux's blocks in call order (304: ten per double block,
three per single block); each unit's compute comes from its layers' FLOPs at their token count
(modulation linears run on one token: they read their weights and do almost nothing), with
each block's attention in the unit entered before it. The FLOP rate is calibrated so the
resident forward at 4,096 + 512 tokens takes the measured 163 ms; other token counts scale
from it. Copies run at the measured 55 GB/s; 129 MB stay outside the blocks.
"""
from loader.profile import Profile

HIDDEN = 3072
RESIDENT_FORWARD_S = 0.163  # measured, at 4,096 image + 512 text tokens
BANDWIDTH = 55e9
FIXED_BYTES = 129_000_000
HBM_BYTES_PER_S = 4.8e12  # a layer on one token is bound by reading its weights
LEAD_S = TAIL_S = 0.001
_ALIGN = 4096


def _linear(fan_in, fan_out, tokens, extra_flops=0):
    nbytes = -(-fan_in * fan_out * 2 // _ALIGN) * _ALIGN + -(-fan_out * 2 // _ALIGN) * _ALIGN
    return nbytes, 2 * tokens * fan_in * fan_out + extra_flops


def _units(image, text, double, single):
    """(bytes, flops) per unit in call order."""
    h, attention = HIDDEN, 4 * (image + text) ** 2 * HIDDEN
    block = [_linear(h, 6 * h, 1), _linear(h, 6 * h, 1),  # both modulations run first
             _linear(h, 3 * h, image), _linear(h, 3 * h, text, attention),  # both qkv, then attention
             _linear(h, h, image), _linear(h, 4 * h, image), _linear(4 * h, h, image),
             _linear(h, h, text), _linear(h, 4 * h, text), _linear(4 * h, h, text)]
    single_block = [_linear(h, 3 * h, 1), _linear(h, 7 * h, image + text, attention),
                    _linear(5 * h, h, image + text)]
    return block * double + single_block * single


def _seconds(units, rate):
    return [max(flops / rate, nbytes / HBM_BYTES_PER_S) for nbytes, flops in units]


def _rate():
    """FLOP/s at which the measured shape's resident forward takes 163 ms."""
    units = _units(4096, 512, 19, 38)
    lo, hi = 1e12, 1e16
    for _ in range(100):  # bisection: the weight-reading floor makes time not proportional to 1/rate
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if sum(_seconds(units, mid)) > RESIDENT_FORWARD_S - LEAD_S - TAIL_S else (lo, mid)
    return lo


def flux_profile(image_tokens=4096, text_tokens=512, double=19, single=38) -> Profile:
    units = _units(image_tokens, text_tokens, double, single)
    return Profile(tuple(b for b, _ in units), tuple(range(len(units))), tuple(_seconds(units, _rate())),
                   BANDWIDTH, FIXED_BYTES, LEAD_S, TAIL_S, key=("flux", image_tokens, text_tokens))


def whole_blocks(profile: Profile, double=19, single=38) -> Profile:
    """``profile`` (a ``flux_profile``) with each block one unit: its chunks' bytes and compute summed."""
    block_of = [b for b, n in enumerate([10] * double + [3] * single) for _ in range(n)]
    unit_bytes = [0] * (double + single)
    for unit, nbytes in enumerate(profile.unit_bytes):
        unit_bytes[block_of[unit]] += nbytes
    order, seconds = [], []
    for unit, s in zip(profile.order, profile.entry_seconds):
        if order and order[-1] == block_of[unit]:
            seconds[-1] += s
        else:
            order.append(block_of[unit])
            seconds.append(s)
    return Profile(tuple(unit_bytes), tuple(order), tuple(seconds), profile.bandwidth, profile.fixed_bytes,
                   profile.lead_seconds, profile.tail_seconds, key=profile.key)
