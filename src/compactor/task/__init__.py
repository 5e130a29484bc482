"""Task models (encoders with a classification head): loading, students, task distillation,
evaluation by accuracy and macro-F1, and ONNX deployment with int8 in onnxruntime."""
