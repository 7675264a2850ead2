"""Running a model: the one decoder, sampling, detokenizing, chat templates.

It reads a mixture only through the `composer.model.protocol.Mixture` protocol and imports
nothing of features, training, compare or serving; everything that generates text comes
through here.
"""
