"""Attention cores for MLA's and GQA's shapes and the layout that says which key each query sees."""
