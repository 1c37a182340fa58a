"""Block maps: which layers of each model family can be cached, and how their calls look."""
