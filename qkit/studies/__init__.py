"""Studies: one module per notebook, each keeping the contract of :mod:`qkit.studies.contract`."""

# Notebook -> study module, in notebook order: adding a study adds its line here.
STUDIES = {
    "01_calibration_data": "qkit.studies.calibration_data",
    "02_quantization_methods": "qkit.studies.quantization_methods",
    "03_kv_cache": "qkit.studies.kv_cache",
    "04_task_sensitivity": "qkit.studies.task_sensitivity",
    "05_drift_monitoring": "qkit.studies.drift_monitoring",
    "06_layer_sensitivity": "qkit.studies.layer_sensitivity",
}
