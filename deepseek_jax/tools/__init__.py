"""Scale and cost without the hardware: compile the steps for a TPU topology (``plan``), read collectives out of
HLO (``hlo``), inference capacity per chip (``capacity``), and model summaries (``info``)."""
