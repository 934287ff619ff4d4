"""Looking inside a model: next-token tables, intermediates, surprisal, plots, the model doctor."""
