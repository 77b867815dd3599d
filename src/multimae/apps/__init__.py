"""Apps on the model and the tasks: predict, export, visualize, demo, pseudolabel."""
