"""Studies: end-to-end runs that train, evaluate, fold and report (the demo, the algorithmic
experiment, the recurrence-regulariser study; a new study is a module here plus a subcommand of
`softshare experiment`). Import anything below them (train, eval, fold, analysis, ...); only
`cli` imports them."""
