"""melanoma_tf: distil a ResNet50 melanoma teacher into a MobileNetV3-Small student.

Heavy modules (TensorFlow) are imported lazily by the stage modules, so that
``import melanoma_tf.config`` stays cheap.
"""

__version__ = "0.1.0"
