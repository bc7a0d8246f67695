"""The U-Net of the classic Keras segmentation exercise, layer for layer."""

import tensorflow as tf

from unet_core import check_input_size

Conv2D = tf.keras.layers.Conv2D


def conv_block(inputs, n_filters=32, dropout_prob=0, max_pooling=True):
    """Two 3×3 convolutions, optional dropout, optional 2×2 pooling.

    Returns `(next_layer, skip_connection)`; the skip is taken before pooling so the decoder
    gets full-resolution features.
    """
    conv = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(inputs)
    conv = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(conv)
    if dropout_prob > 0:
        conv = tf.keras.layers.Dropout(dropout_prob)(conv)
    next_layer = tf.keras.layers.MaxPooling2D(2)(conv) if max_pooling else conv
    return next_layer, conv


def upsampling_block(expansive_input, contractive_input, n_filters=32):
    """Transposed convolution ×2, concatenation with the encoder's skip, two 3×3 convolutions."""
    up = tf.keras.layers.Conv2DTranspose(n_filters, 3, strides=2, padding="same")(expansive_input)
    merge = tf.keras.layers.concatenate([up, contractive_input], axis=3)
    conv = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(merge)
    return Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(conv)


def unet_model(input_size=(96, 128, 3), n_filters=32, n_classes=23):
    """The full U-Net; outputs per-pixel logits of shape (batch, height, width, n_classes)."""
    check_input_size(input_size[0], input_size[1])
    inputs = tf.keras.Input(input_size)
    block1 = conv_block(inputs, n_filters)
    block2 = conv_block(block1[0], n_filters * 2)
    block3 = conv_block(block2[0], n_filters * 4)
    block4 = conv_block(block3[0], n_filters * 8, dropout_prob=0.3)
    block5 = conv_block(block4[0], n_filters * 16, dropout_prob=0.3, max_pooling=False)

    up6 = upsampling_block(block5[0], block4[1], n_filters * 8)
    up7 = upsampling_block(up6, block3[1], n_filters * 4)
    up8 = upsampling_block(up7, block2[1], n_filters * 2)
    up9 = upsampling_block(up8, block1[1], n_filters)

    features = Conv2D(n_filters, 3, activation="relu", padding="same", kernel_initializer="he_normal")(up9)
    # The output layer stays float32 under mixed precision so logits and the loss keep their range.
    logits = Conv2D(n_classes, 1, padding="same", dtype="float32")(features)
    return tf.keras.Model(inputs=inputs, outputs=logits, name="unet")
