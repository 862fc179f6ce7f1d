"""Segmenting an image: the checked plan and its tiles, segment(), the live preview's regions, time-lapse frames."""
