"""Tools for people and programs: scenarios, dumps, image decoding, isolation checks and plots."""
