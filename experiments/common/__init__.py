"""What the experiment scripts share: the command line (`cli`), run folders and atomic files
(`run_folder`), resumable run state (`runstate`), the counting rules of loss curves (`curves`),
learning-rate selection (`rates`) and the sweep of full-batch configurations, in-process or on
Ray (`sweep`)."""
