"""The code behind ``edgesparse bench``: one FFN layer, and whole-model decode."""
