import pytest
import tensorflow as tf

from unet_core import conv_block, unet_model, upsampling_block


def layer_table(model):
    """(type, output shape without batch, params) of every non-input layer, in order."""
    rows = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        rows.append((type(layer).__name__, tuple(layer.output_shape[1:]), layer.count_params()))
    return rows


def test_conv_block_with_pooling():
    inputs = tf.keras.Input((96, 128, 3))
    model = tf.keras.Model(inputs, conv_block(inputs, 32))
    assert layer_table(model) == [
        ("Conv2D", (96, 128, 32), 896),
        ("Conv2D", (96, 128, 32), 9248),
        ("MaxPooling2D", (48, 64, 32), 0),
    ]
    conv = model.layers[1]
    assert conv.padding == "same" and conv.activation.__name__ == "relu"
    assert type(conv.kernel_initializer).__name__ == "HeNormal"


def test_conv_block_with_dropout():
    inputs = tf.keras.Input((96, 128, 3))
    model = tf.keras.Model(inputs, conv_block(inputs, 1024, dropout_prob=0.1, max_pooling=True))
    assert layer_table(model) == [
        ("Conv2D", (96, 128, 1024), 28672),
        ("Conv2D", (96, 128, 1024), 9438208),
        ("Dropout", (96, 128, 1024), 0),
        ("MaxPooling2D", (48, 64, 1024), 0),
    ]
    assert model.layers[3].rate == 0.1


def test_conv_block_skip_is_taken_before_pooling():
    inputs = tf.keras.Input((96, 128, 3))
    next_layer, skip = conv_block(inputs, 8)
    assert tuple(next_layer.shape[1:]) == (48, 64, 8)
    assert tuple(skip.shape[1:]) == (96, 128, 8)
    same, same_skip = conv_block(inputs, 8, max_pooling=False)
    assert same is same_skip


def test_upsampling_block():
    expansive = tf.keras.Input((12, 16, 256))
    contractive = tf.keras.Input((24, 32, 128))
    model = tf.keras.Model([expansive, contractive], upsampling_block(expansive, contractive, 32))
    assert layer_table(model) == [
        ("Conv2DTranspose", (24, 32, 32), 73760),
        ("Concatenate", (24, 32, 160), 0),
        ("Conv2D", (24, 32, 32), 46112),
        ("Conv2D", (24, 32, 32), 9248),
    ]


# The exercise's printed summary of unet_model(), layer by layer (type, output shape, params).
CLASSIC_UNET = [
    ("Conv2D", (96, 128, 32), 896), ("Conv2D", (96, 128, 32), 9248), ("MaxPooling2D", (48, 64, 32), 0),
    ("Conv2D", (48, 64, 64), 18496), ("Conv2D", (48, 64, 64), 36928), ("MaxPooling2D", (24, 32, 64), 0),
    ("Conv2D", (24, 32, 128), 73856), ("Conv2D", (24, 32, 128), 147584), ("MaxPooling2D", (12, 16, 128), 0),
    ("Conv2D", (12, 16, 256), 295168), ("Conv2D", (12, 16, 256), 590080), ("Dropout", (12, 16, 256), 0),
    ("MaxPooling2D", (6, 8, 256), 0),
    ("Conv2D", (6, 8, 512), 1180160), ("Conv2D", (6, 8, 512), 2359808), ("Dropout", (6, 8, 512), 0),
    ("Conv2DTranspose", (12, 16, 256), 1179904), ("Concatenate", (12, 16, 512), 0),
    ("Conv2D", (12, 16, 256), 1179904), ("Conv2D", (12, 16, 256), 590080),
    ("Conv2DTranspose", (24, 32, 128), 295040), ("Concatenate", (24, 32, 256), 0),
    ("Conv2D", (24, 32, 128), 295040), ("Conv2D", (24, 32, 128), 147584),
    ("Conv2DTranspose", (48, 64, 64), 73792), ("Concatenate", (48, 64, 128), 0),
    ("Conv2D", (48, 64, 64), 73792), ("Conv2D", (48, 64, 64), 36928),
    ("Conv2DTranspose", (96, 128, 32), 18464), ("Concatenate", (96, 128, 64), 0),
    ("Conv2D", (96, 128, 32), 18464), ("Conv2D", (96, 128, 32), 9248),
    ("Conv2D", (96, 128, 32), 9248), ("Conv2D", (96, 128, 23), 759),
]


def test_unet_model_matches_the_classic_exercise():
    model = unet_model()
    assert model.count_params() == 8_640_471
    assert model.output_shape == (None, 96, 128, 23)
    assert layer_table(model) == CLASSIC_UNET
    # Skips come from before pooling: the first decoder concat joins the block-4 dropout output.
    concat = [layer for layer in model.layers if type(layer).__name__ == "Concatenate"][0]
    assert type(concat.input[1].node.layer).__name__ == "Dropout"


def test_under_mixed_precision_the_logits_stay_float32():
    # bfloat16 logits lose the range the softmax and the loss need (--mixed-precision bf16 trains under this policy).
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = unet_model((32, 32, 3), n_filters=2, n_classes=3)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert model.layers[-2].compute_dtype == "bfloat16" and model.output.dtype == tf.float32


def test_unet_model_other_sizes():
    model = unet_model((64, 80, 3), n_filters=8, n_classes=5)
    assert model.output_shape == (None, 64, 80, 5)
    # The output's shape alone holds with n_filters ignored: every layer is the classic table's at
    # this size, with a quarter of its filters and 5 classes.
    last = len(CLASSIC_UNET) - 1
    expected = [(kind, (height * 64 // 96, width * 80 // 128, 5 if index == last else channels // 4))
                for index, (kind, (height, width, channels), _) in enumerate(CLASSIC_UNET)]
    assert [row[:2] for row in layer_table(model)] == expected


@pytest.mark.parametrize("size", [(100, 128, 3), (96, 120, 3), (0, 128, 3)])
def test_unet_model_rejects_sizes_not_divisible_by_16(size):
    with pytest.raises(ValueError, match="unet_model input height and width must be positive multiples of 16"):
        unet_model(size)
