"""Literature experiments run by ``gradkit bench literature``; one module per claim (see ``literature.py``)."""
