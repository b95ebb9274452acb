"""moetvm: compile Mixture-of-Experts models with Apache TVM; run them on edge boards."""
