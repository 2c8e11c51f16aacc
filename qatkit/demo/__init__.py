"""The main job: ``qatkit demo`` on bundled real data (sklearn digits, Fashion-MNIST).

``data`` loads and splits the real datasets; ``recipe`` trains, calibrates, converts, runs QAT
and measures every stage; ``distributed`` is the same recipe over several processes.
"""
