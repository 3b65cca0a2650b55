"""Planning before quantizing: model shapes and memory, the hardware advisor."""
