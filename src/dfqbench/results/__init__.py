"""The results model behind `make tables`: every number a table shows, as one row that says where it comes from.

`entries` builds the rows (reproduced runs from record.json files, the papers' reported numbers, official-code
runs), `names` splits a method name into method and variant, `markdown`, `leaderboard` and `parity` render them.
"""
