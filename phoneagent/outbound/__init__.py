"""Calls the business places: a persona calls a number (``dialer``), Twilio asks what to do when
someone answers and reports what became of the call (``routes``). The decisions — may this call
be placed now, what an answer means, how an unanswered call is reported — are in ``rules``,
free of I/O; what travels with a placed call is ``context``; ``phoneagent call`` is ``cli``.

Nothing is imported here: ``phoneagent``'s command line loads this package's ``cli`` at start.
"""
