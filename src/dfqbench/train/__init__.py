"""The shared trainer of the generator-based data-free QAT family (GDFQ, Qimera, AIT, ...).

Parts chosen by name from a method yaml: generators (`generators.GENERATORS`), generator and student loss terms
(`losses.GENERATOR_LOSSES`, `losses.STUDENT_LOSSES`); the loop is `trainer.Trainer`, the schedule
`schedule.Schedule`. This package file imports nothing heavy (the CLI imports its errors before torch).
"""
