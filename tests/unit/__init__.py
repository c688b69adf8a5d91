"""Fast tests of one component against hand-written expectations."""
