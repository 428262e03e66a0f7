"""Routing stage: public model names → deployments (`table`), and the choice of one (`choice`)."""
