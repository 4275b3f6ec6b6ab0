"""Built-in tasks: data a model can learn on a CPU, with the scoring that says whether it did."""
