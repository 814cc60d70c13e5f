"""From raw multi-echo GRE to a local field: loading and phase scaling, echo fit (total field, N_std,
R2*), spatial unwrapping, brain mask, background field removal. One file per step family; each
step is one function with one parameter record, declared as a :class:`~.steps.Step` in the file's
``STEPS`` tuple (collected by the registry, like the inversions)."""
