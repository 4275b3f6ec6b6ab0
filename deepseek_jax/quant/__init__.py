"""FP8: the one block quantizer and its constants (``blocks``), DeepSeek's FP8 training recipe (``recipe``),
weights kept in FP8 on the devices (``weights``) and the Pallas kernel that multiplies by them (``kernel``)."""
