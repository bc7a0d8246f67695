"""FLOPs of the model, counted from its layers, and the machine's fp32 matmul peak.

Counted per image, forward: a Conv2D makes 2·H·W·k²·Cin·Cout FLOPs on its output size H×W, plus
H·W·Cout bias adds. A stride-s Conv2DTranspose does the same arithmetic per *input* pixel (each
scatters a k²·Cin·Cout product into the output), i.e. 2·(H/s)·(W/s)·k²·Cin·Cout on its output
size H×W, plus the bias adds on the output. Counting the transposed convolutions at their full
output size would overstate them s² = 4 times (19.2 instead of 15.1 GFLOP per default training
image). Activations, pooling, concatenation, dropout and the loss are left out (under 1%).
Training ≈ 3 × forward (forward, gradient w.r.t. inputs, gradient w.r.t. weights).
"""

import math
import time

import tensorflow as tf

TRAINING_FACTOR = 3


def layer_forward_flops(layer):
    """Forward FLOPs per image of one U-Net layer: its convolutions; pooling, concatenation and
    dropout have no multiply-adds worth counting."""
    if isinstance(layer, tf.keras.layers.Conv2DTranspose):  # before Conv2D: it subclasses it
        out_h, out_w, c_out = layer.output_shape[1:]
        c_in = layer.input_shape[-1]
        in_h, in_w = out_h / layer.strides[0], out_w / layer.strides[1]
        bias = out_h * out_w * c_out if layer.use_bias else 0
        return 2 * in_h * in_w * math.prod(layer.kernel_size) * c_in * c_out + bias
    if isinstance(layer, tf.keras.layers.Conv2D):
        out_h, out_w, c_out = layer.output_shape[1:]
        c_in = layer.input_shape[-1] // layer.groups
        bias = out_h * out_w * c_out if layer.use_bias else 0
        return 2 * out_h * out_w * math.prod(layer.kernel_size) * c_in * c_out + bias
    return 0


def forward_flops_per_image(model):
    return int(sum(layer_forward_flops(layer) for layer in model.layers))


def training_flops_per_image(model):
    return TRAINING_FACTOR * forward_flops_per_image(model)


def matmul_peak(size, chain, calls):
    """Best fp32 FLOP/s of `chain` dependent size×size matmuls inside one tf.function.

    One graph call keeps the matmuls back to back (an eager one-off matmul pays dispatch and
    thread wake-up, and reads about half the real peak). Returns (best FLOP/s, every call's).
    """
    scale = 1.0 / math.sqrt(size)  # a random Gaussian matrix / sqrt(n) keeps the chain's values bounded
    matrix = tf.random.stateless_normal((size, size), seed=(1, 2), dtype=tf.float32) * scale

    @tf.function
    def chained(start):
        product = start
        for _ in range(chain):
            product = tf.matmul(product, matrix)
        return tf.reduce_sum(product)

    chained(matrix).numpy()  # trace and warm up
    flops = chain * 2 * size**3
    rates = []
    for _ in range(calls):
        started = time.perf_counter()
        chained(matrix).numpy()
        rates.append(flops / (time.perf_counter() - started))
    return max(rates), rates
